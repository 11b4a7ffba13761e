"""How the photos here were made from the originals (run once; kept for the record).

    python tests/data/photos/derive.py SKLEARN_IMAGES_DIR MATPLOTLIB_SAMPLE_DATA_DIR
"""

import sys
from pathlib import Path

from PIL import Image

sk, mpl = Path(sys.argv[1]), Path(sys.argv[2])
out = Path(__file__).parent
china = Image.open(sk / "china.jpg").convert("RGB")  # 640 x 427
flower = Image.open(sk / "flower.jpg").convert("RGB")  # 640 x 427
hopper = Image.open(mpl / "grace_hopper.jpg").convert("RGB")  # 512 x 600, portrait

china.resize((1400, 934), Image.Resampling.BICUBIC).save(out / "china_large.jpg", quality=50)  # huge: 1400 px
china.crop((200, 150, 360, 270)).resize((40, 30), Image.Resampling.BICUBIC).save(out / "china_tiny.jpg", quality=90)
china.convert("L").resize((420, 280), Image.Resampling.BICUBIC).save(out / "china_gray.jpg", quality=85)
flower.resize((330, 220), Image.Resampling.BICUBIC).convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(
    out / "flower_palette.png", optimize=True)
flower.resize((300, 200), Image.Resampling.BICUBIC).convert("CMYK").save(out / "flower_cmyk.jpg", quality=90)
rgba = hopper.resize((170, 199), Image.Resampling.BICUBIC).convert("RGBA")
alpha = Image.linear_gradient("L").resize(rgba.size)  # transparent at the top, opaque at the bottom
rgba.putalpha(alpha)
rgba.save(out / "hopper_rgba.png", optimize=True)
hopper.resize((384, 450), Image.Resampling.BICUBIC).save(out / "hopper.jpg", quality=85)  # portrait RGB
