"""The one boundary (cifarkit/core/untrusted/): what a stranger's image, file name, folder or run
folder can make the project do. Each test is an input crafted as an attacker would make it.

* Images: only PNG and JPEG are decoded (no other decoder, Ghostscript included, is reached: a
  fake ``gs`` records no call), within a pixel limit, 16-bit, CMYK, palette and alpha brought to
  RGB correctly, and a seeded fuzz of every format Pillow writes ends only in pixels or the
  project's one-line error.
* Output: names from files reach a terminal escaped; JSON never holds NaN.
* Folders and run folders: a symlink loop counts each image once; a resumed run carries only
  files from the run folder it resumes; a run folder's broken files are read, not crashed on.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cifarkit.core.errors import UserError
from cifarkit.core.rundir import completed, find_unfinished
from cifarkit.core.untrusted import ImageTooLarge, check_tree, decode_image, read_json_object, shown, to_json
from cifarkit.core.untrusted.images import BACKGROUND
from cifarkit.data.images import load_image
from cifarkit.fit.checkpoint_io import CarryCheckpoints
from cifarkit.nets.models import BasicCNN
from conftest import (
    DATA_INFO3,
    ROOT,
    compose,
    craft_checkpoint,
    datamodule,
    error_line,
    folder_overrides,
)
from tiny_files import write_image_folder
from untrusted_files import EPS, fake_gs, mutants, seeds

FIX = "send a PNG or JPEG file"


def decode(data: bytes, size: int = 32, **kw) -> np.ndarray:
    return decode_image(data, size, "the image", FIX, **kw)


def png(im: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    im.save(out, "PNG", **kw)
    return out.getvalue()


def test_only_png_and_jpeg_are_decoded() -> None:
    """Every other format Pillow knows (TIFF, BMP, GIF, DDS, ICO, SGI, JPEG 2000, WebP, EPS...) is
    refused in one line, even where Pillow would decode it."""
    found = seeds()
    assert {"PNG", "JPEG", "TIFF", "BMP", "GIF", "DDS", "ICO", "SGI", "EPS"} <= set(found)
    for fmt, data in found.items():
        if fmt in ("PNG", "JPEG", "MPO"):  # an MPO file is a JPEG with an extension: decoded as one
            assert decode(data).shape == (32, 32, 3), fmt
            continue
        with pytest.raises(
            UserError,
            match=(
                r"^cannot read the image \(not an image file of a format read here: PNG "
                r"or JPEG\); send a PNG or JPEG file$"
            ),
        ):
            decode(data)


def test_ghostscript_is_never_run(tmp_path: Path) -> None:
    """An upload that starts with %!PS, given to predict.py as a file: Pillow's EPS plugin would
    run ``gs`` on it. A fake ``gs`` first on PATH records no call; the file is skipped in one line."""
    record = tmp_path / "gs-calls"
    bin_dir = tmp_path / "bin"
    fake_gs(bin_dir, record)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(EPS)  # the suffix is a stranger's too
    (images / "b.eps").write_bytes(EPS)
    Image.new("RGB", (32, 32), "red").save(images / "c.png")
    code = (
        "import sys; from PIL import Image; from cifarkit.core.untrusted import decode_image\n"
        "for f in sys.argv[1:]:\n"
        "    try: decode_image(open(f, 'rb').read(), 32, f, 'x')\n"
        "    except Exception as e: print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(
        [sys.executable, "-c", code, *map(str, sorted(images.iterdir()))],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("UserError cannot read") == 2 and "not an image file of a format read here" in r.stdout, (
        r.stdout
    )
    assert not record.exists(), record.read_text()


def test_pixel_limit_is_applied_before_decoding() -> None:
    """A PNG that declares more pixels than the limit is refused from its header (ImageTooLarge,
    serve.py's 413); a large JPEG is decoded at reduced scale, so a 50-megapixel photo passes."""
    big = png(Image.new("L", (5000, 4000)))  # 20 MP, a few kB
    with pytest.raises(
        ImageTooLarge, match=r"too large to decode safely \(5000x4000 pixels is over max_megapixels=16\)"
    ):
        decode(big)
    assert decode(big, max_megapixels=25).shape == (32, 32, 3)  # configurable
    photo = io.BytesIO()
    Image.new("RGB", (8160, 6120), (10, 200, 30)).save(photo, "JPEG", quality=50)  # a 50 MP phone photo
    assert np.abs(decode(photo.getvalue()).astype(int) - [10, 200, 30]).max() <= 3


def test_modes_become_the_right_rgb() -> None:
    """16-bit grey is scaled to 8 bits (Pillow's conversion clips it: almost white), CMYK is
    converted, palette and alpha images are laid on a white background."""
    grey16 = Image.fromarray(np.full((32, 32), 0x8000, np.uint16))  # mid grey in 16 bits
    assert (decode(png(grey16)) == 128).all()
    ramp = Image.fromarray(np.tile(np.arange(0, 65536, 2048, dtype=np.uint16), (32, 1)))
    assert decode(png(ramp))[0, :, 0].tolist() == list(range(0, 256, 8))

    cmyk = io.BytesIO()
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(cmyk, "JPEG", quality=95)  # red
    assert np.abs(decode(cmyk.getvalue()).astype(int) - [255, 0, 0]).max() <= 3

    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))  # transparent, hiding red
    rgba.paste((0, 0, 0, 128), (0, 0, 16, 32))  # half-transparent black on the left
    got = decode(png(rgba))
    assert (got[:, 16:] == BACKGROUND).all() and np.abs(got[:, :16].astype(int) - 127).max() <= 1
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    assert (decode(png(palette, transparency=1)) == BACKGROUND).all()  # index 1 (red) is transparent
    assert (decode(png(palette)) == [255, 0, 0]).all()


@pytest.mark.parametrize("fmt", sorted(seeds()))
def test_fuzz_every_format(fmt: str) -> None:
    """Seeded mutations of a file in every format Pillow writes (1,000+ in all, most of them PNG
    and JPEG, the formats that are decoded): each one gives 32x32 pixels or the one-line error."""
    data = seeds()[fmt]
    n = 250 if fmt in ("PNG", "JPEG") else 25
    outcomes = {"pixels": 0, "refused": 0}
    for i, mutant in enumerate(mutants(data, n, seed=sum(map(ord, fmt)))):
        try:
            got = decode(mutant)
        except UserError as e:
            assert "\n" not in str(e) and str(e).startswith("cannot read the image") and str(e).endswith(FIX), (
                fmt,
                i,
                e,
            )
            outcomes["refused"] += 1
            continue
        assert got.shape == (32, 32, 3) and got.dtype == np.uint8, (fmt, i)
        outcomes["pixels"] += 1
    assert sum(outcomes.values()) == n
    if fmt in ("PNG", "JPEG"):  # the mutants reach the decoders, not only the format check
        assert outcomes["pixels"] > 0 and outcomes["refused"] > 0, outcomes


def test_a_crafted_dds_is_one_line() -> None:
    """A DDS header with an unknown pixel format made Pillow raise NotImplementedError, which no
    handler mapped: now it is not even opened."""
    header = bytearray(seeds()["DDS"])
    header[84:88] = b"ZZZZ"  # the FourCC
    with pytest.raises(UserError, match="not an image file of a format read here"):
        decode(bytes(header))


def test_names_are_escaped_for_a_terminal() -> None:
    assert shown("cat") == "cat" and shown("chat noir") == "chat noir" and shown("Käfer") == "Käfer"
    for evil in ("\x1b]0;pwned\x07", "a\nforged\t0.99", "nul\x00", "\u202etxt.png", "bad\udcff.png", "\x9b2J"):
        out = shown(evil)
        assert out.isprintable() and "\\" in out, out


def test_predict_output_cannot_be_steered(tmp_path: Path, main) -> None:
    """File names holding escape sequences, a newline and a tab, or bytes that are not UTF-8: one
    line per image, the right number of columns, no control character on stdout or stderr."""
    torch.manual_seed(0)
    ckpt = craft_checkpoint(
        tmp_path / "c.ckpt", {"_target_": "cifarkit.nets.models.BasicCNN"}, BasicCNN(num_classes=3).state_dict()
    )
    images = tmp_path / "images"
    images.mkdir()
    names = ["\x1b]0;pwned\x07.png", "a\nforged\t0.99.png", os.fsdecode(b"bad\xff.png"), "fine.png"]
    for name in names:
        Image.new("RGB", (32, 32), "red").save(images / name)
    (images / "\x1b[2Jbroken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    r = main("predict.py", [f"ckpt_path={ckpt}", f"inputs={images}", "top_k=2", f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert len(lines) == len(names) and all(len(line.split("\t")) == 3 for line in lines), lines
    assert all(line.isprintable() for line in r.out.replace("\t", " ").splitlines()), r.out
    assert "\x1b" not in r.err and "skipped: cannot read image" in r.err and "\\x1b[2Jbroken.png" in r.err
    r = main(
        "predict.py", [f"ckpt_path={ckpt}", f"inputs={images}", "format=json", f"paths.log_dir={tmp_path / 'logs'}"]
    )
    rows = [json.loads(line) for line in r.out.splitlines()]
    # a byte that is not UTF-8 is written as the text \udcff: every string valid Unicode (test_doors_inputs.py)
    assert sorted(Path(row["path"]).name for row in rows) == sorted(
        n.encode(errors="backslashreplace").decode() for n in names
    )
    assert r.out.isascii()
    assert DATA_INFO3["classes"] == sorted({c for row in rows for c, _ in row["top"]})


@pytest.mark.parametrize(
    "name,quoted",
    [
        ("evil\x1b[2J\x1b]0;pwned\x07.ckpt", "evil\\x1b[2J\\x1b]0;pwned\\x07.ckpt"),
        ("evil\nerror: forged.ckpt", "evil error: forged.ckpt"),
    ],
)
def test_an_error_line_quotes_a_name_escaped(name: str, quoted: str, tmp_path: Path, main) -> None:
    """The one error line quotes what it was given (here a missing checkpoint's name, which
    Hydra's parser or the project refuses) with its control characters escaped."""
    r = main("predict.py", [f"ckpt_path={tmp_path / name}", f"inputs={tmp_path}", f"paths.log_dir={tmp_path / 'logs'}"])
    assert r.code == 1 and "\x1b" not in r.err and "\x07" not in r.err
    assert quoted in error_line(r.err)  # the only error line, the forged one inside it included


def test_nan_is_never_written_as_json(tmp_path: Path, main, monkeypatch: pytest.MonkeyPatch) -> None:
    """A net that overflows on one image: predict.py skips it in one line, serve.py answers a JSON
    error; ``to_json`` refuses NaN rather than write it."""
    import cifarkit.infer.predict as cp
    from cifarkit.infer.model import Model
    from cifarkit.infer.serve import Answer, Classifier  # the serve extra's LitServe

    with pytest.raises(ValueError):
        to_json({"p": math.nan})
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), "black").save(images / "a.png")
    Image.new("RGB", (32, 32), "white").save(images / "b.png")

    def scorer(cfg):
        def score(x: np.ndarray) -> torch.Tensor:  # white overflows
            p = torch.full((len(x), 3), 1 / 3)
            p[torch.from_numpy(x).float().mean(dim=(1, 2, 3)) > 128] = math.nan
            return p

        return Model(score, ["cat", "dog", "frog"], 32)

    monkeypatch.setattr(cp, "load_model", scorer)
    r = main(
        "predict.py",
        [f"ckpt_path={tmp_path / 'x.ckpt'}", f"inputs={images}", "format=json", f"paths.log_dir={tmp_path / 'logs'}"],
    )
    assert r.code == 0 and [Path(json.loads(line)["path"]).name for line in r.out.splitlines()] == ["a.png"]
    assert "b.png is not a number" in r.err and "\n" not in r.out.rstrip("\n")
    reply = Classifier.encode_response(None, Answer(None, 1, 1))
    body = json.loads(reply.body, parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
    assert reply.status_code == 500 and list(body) == ["error"] and "not a number" in body["error"]


def test_nested_data_is_bounded_without_recursion() -> None:
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(UserError, match="nested over 12 levels"):
        check_tree(deep, "x", "fix")
    shared: list = [0] * 1000
    for _ in range(5):
        shared = [shared] * 1000  # 10^18 values reached, a few kB pickled
    with pytest.raises(UserError, match="holds over 100000 values"):
        check_tree(shared, "x", "fix", max_depth=100)
    check_tree({"a": [1, 2, {"b": 3}]}, "x", "fix")


def test_a_symlink_loop_counts_each_image_once(tmp_path: Path) -> None:
    """``train/cat/again -> .`` made every image count 41 times (torchvision follows links)."""
    root = write_image_folder(tmp_path / "folder", n_train=6, n_test=3)
    (root / "train" / "cat" / "again").symlink_to(".")
    (root / "test" / "dog" / "up").symlink_to("..")
    (root / "train" / "dog" / "twin.png").symlink_to(next((root / "train" / "dog").glob("*.*")))
    dm = datamodule(tmp_path, folder_overrides(root, tmp_path))
    files = dm._files()
    for split, n in (("train", 18), ("test", 9)):
        real = {p.resolve() for p in (root / split).rglob("*.*") if not p.is_symlink()}
        assert len(files[split]) == n == len(real) and {p.resolve() for p, _ in files[split]} == real, split


def test_class_folders_a_checkpoint_could_not_hold_are_refused(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "folder", n_train=3, n_test=3)
    for split in ("train", "test"):
        (root / split / "dog").rename(root / split / "do\x1b[2Jg")
    with pytest.raises(UserError, match=r"class folder .*do\\x1b\[2Jg has a character"):
        _ = datamodule(tmp_path, folder_overrides(root, tmp_path)).classes


def test_a_resume_carries_only_its_own_run_files(tmp_path: Path) -> None:
    """A crafted checkpoint's ``best_k_models`` lists a file outside the run it comes from (a
    secret, /etc/passwd): nothing is linked or copied into the new run's checkpoints folder."""
    old = tmp_path / "old" / "checkpoints"
    old.mkdir(parents=True)
    (old / "epoch=1.ckpt").write_bytes(b"kept")
    (old / "last.ckpt").write_bytes(b"resumed from")
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    new = tmp_path / "new" / "checkpoints"
    cb = SimpleNamespace(state_key="ModelCheckpoint", dirpath=str(new))
    trainer = SimpleNamespace(
        checkpoint_callbacks=[cb],
        is_global_zero=True,
        ckpt_path=str(old / "last.ckpt"),
        strategy=SimpleNamespace(barrier=lambda name: None),
    )
    best = {
        str(old / "epoch=1.ckpt"): 0.9,
        str(secret): 0.99,
        "/etc/passwd": 1.0,
        str(old / ".." / ".." / "secret.txt"): 0.5,
    }
    state = {
        "dirpath": "/etc",
        "best_k_models": best,
        "best_model_path": "/etc/passwd",
        "kth_best_model_path": str(secret),
        "last_model_path": str(old / "last.ckpt"),
    }
    CarryCheckpoints().on_load_checkpoint(trainer, None, {"callbacks": {"ModelCheckpoint": state}})
    assert sorted(p.name for p in new.iterdir()) == ["epoch=1.ckpt"]
    assert state["best_k_models"] == {str(new / "epoch=1.ckpt"): 0.9} and state["best_model_path"] == ""


def test_broken_run_folders_are_read_not_crashed_on(tmp_path: Path) -> None:
    """metrics.json that is not an object or not JSON, a config.yaml cut short: ckpt_path=auto
    passes such a run over instead of ending in a traceback."""
    runs = tmp_path / "logs" / "train" / "runs"
    cfg = compose(tmp_path, ["trainer=cpu"])
    for name, metrics, config in (
        ("list", "[1, 2]", None),
        ("text", "not json", None),
        ("cut", None, "data:\n  root: [unclosed"),
    ):
        run = runs / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(config or (ROOT / "configs" / "trusted_targets.yaml").read_text())
        if metrics is not None:
            (run / "metrics.json").write_text(metrics)
        assert completed(run) is False
    assert read_json_object(runs / "list" / "metrics.json") is None
    assert find_unfinished(runs, cfg) == (None, [])


def test_load_image_skips_nothing_it_should_read(tmp_path: Path) -> None:
    """The positive control: ordinary files of the project's images still decode as before."""
    root = write_image_folder(tmp_path / "folder", n_train=3, n_test=1)
    for f in sorted((root / "train").rglob("*.*")):
        x = load_image(f, 32)
        assert x.shape == (32, 32, 3) and x.dtype == np.uint8
        assert np.array_equal(x, np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.BILINEAR)))
