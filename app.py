"""vidlmm's Gradio app: `python app.py [--model M] [--host H] [--port P]` (environment: VIDLMM_MODEL, VIDLMM_HOST,
VIDLMM_PORT, ...; `python app.py --help` lists every option). Also the entry point of the Hugging Face Space."""

import importlib.util
import sys

if importlib.util.find_spec("spaces") is not None:
    import spaces  # noqa: F401 - on ZeroGPU it must be imported before torch touches CUDA

from app import main

if __name__ == "__main__":
    sys.exit(main())
