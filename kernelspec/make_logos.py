"""Draw the Parallax kernel logos (run once; the PNGs and the SVG are committed
and embedded in the binary by kernel/src/kernelspec.rs).

The mark: two layered rounded squares offset along the diagonal (the same
thing seen from two viewpoints: parallax), the front one carrying three
parallel bars (engines running side by side).

    .venv/bin/python kernelspec/make_logos.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent
BACK = (43, 108, 176, 255)  # blue
FRONT = (237, 137, 54, 235)  # orange, slightly see-through
BAR = (255, 255, 255, 255)

# geometry in a 64-unit square
BACK_BOX = (4, 4, 42, 42)
FRONT_BOX = (20, 20, 60, 60)
RADIUS = 8
BARS = [(27, 29, 53, 34), (27, 37.5, 47, 42.5), (27, 46, 51, 51)]


def draw(size: int) -> Image.Image:
    scale = 16  # supersample, then downsample for anti-aliasing
    s = size * scale / 64
    big = size * scale
    box = lambda b: tuple(round(v * s) for v in b)  # noqa: E731
    img = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    back = Image.new("RGBA", img.size, (0, 0, 0, 0))
    ImageDraw.Draw(back).rounded_rectangle(box(BACK_BOX), round(RADIUS * s), fill=BACK)
    img = Image.alpha_composite(img, back)
    front = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(front)
    d.rounded_rectangle(box(FRONT_BOX), round(RADIUS * s), fill=FRONT)
    for b in BARS:
        d.rounded_rectangle(box(b), round(2.5 * s), fill=BAR)
    img = Image.alpha_composite(img, front)
    return img.resize((size, size), Image.LANCZOS)


def svg() -> str:
    def rect(b, r, fill, opacity=None):
        x0, y0, x1, y1 = b
        op = f' fill-opacity="{opacity}"' if opacity is not None else ""
        return (
            f'  <rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" '
            f'rx="{r}" fill="{fill}"{op}/>\n'
        )

    out = '<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">\n'
    out += "  <title>Parallax</title>\n"
    out += rect(BACK_BOX, RADIUS, "#2b6cb0")
    out += rect(FRONT_BOX, RADIUS, "#ed8936", round(235 / 255, 3))
    for b in BARS:
        out += rect(b, 2.5, "#ffffff")
    return out + "</svg>\n"


if __name__ == "__main__":
    for n in (32, 64):
        draw(n).save(HERE / f"logo-{n}x{n}.png", optimize=True)
    (HERE / "logo-svg.svg").write_text(svg())
