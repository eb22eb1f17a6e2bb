"""Rebuild moving_shapes.mp4 (H.264, 10 s, 320x240, 15 fps): a red square moves left to right; a blue circle
appears at 2 s and turns green at 6 s. Run: python assets/examples/make_moving_shapes.py"""

from pathlib import Path

import av
import numpy as np

W, H, FPS, N = 320, 240, 15, 150


def main(out=Path(__file__).with_name("moving_shapes.mp4")):
    container = av.open(str(out), "w")
    stream = container.add_stream("libx264", rate=FPS)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    stream.options = {"crf": "28"}
    yy, xx = np.mgrid[0:H, 0:W]
    circle = (xx - 240) ** 2 + (yy - 190) ** 2 < 30**2
    for t in range(N):
        frame = np.full((H, W, 3), 235, np.uint8)
        x0 = int(20 + t * (W - 80) / N)
        frame[90:140, x0:x0 + 50] = (220, 40, 40)
        if t >= 2 * FPS:
            frame[circle] = (40, 70, 220) if t < 6 * FPS else (40, 180, 60)
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


if __name__ == "__main__":
    main()
