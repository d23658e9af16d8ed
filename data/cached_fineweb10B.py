#!/usr/bin/env python3
"""Download FineWeb already tokenized with GPT-2, as the modded-nanogpt speedrun does.

    python data/cached_fineweb10B.py            # the val shard and 8 train shards of 100M tokens each
    python data/cached_fineweb10B.py 103        # all of FineWeb 10B
    python data/cached_fineweb10B.py 20 --variant edu10B

Shards already present and valid are kept; set HF_ENDPOINT to download from a mirror.
"""
import argparse
import sys
from pathlib import Path
from typing import NamedTuple

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HfHubHTTPError

from shards import check_shard

DATA_DIR = Path(__file__).resolve().parent


class Variant(NamedTuple):
    repo: str
    prefix: str
    train_shards: int


# train shard counts as published with each repo (the 10B one is what the speedrun records use)
VARIANTS = {
    "10B": Variant("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "100B": Variant("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "edu10B": Variant("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
}


class DownloadError(Exception):
    pass


def shard_names(prefix: str, num_train: int) -> list[str]:
    return [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, num_train + 1)]


# an invalid file is deleted: hf_hub_download would otherwise keep it when its recorded etag matches
def keep_if_valid(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        check_shard(path)
        return True
    except ValueError as error:
        print(f"replacing {error}")
        path.unlink()
        return False


def download(repo: str, name: str, out: Path) -> None:
    try:
        path = Path(hf_hub_download(repo_id=repo, filename=name, repo_type="dataset", local_dir=out))
    except OSError as error:  # HfHubHTTPError, or LocalEntryNotFoundError when there is no connection
        if isinstance(error, HfHubHTTPError) and error.response.status_code == 404:
            raise DownloadError(f"{name} is not in the dataset {repo}; ask for fewer train shards") from error
        raise DownloadError(f"downloading {name} from {repo} failed: {' '.join(str(error).split())}") from error
    try:
        check_shard(path)
    except ValueError as error:
        path.unlink()
        raise DownloadError(f"bad download, deleted {error}; run again to retry") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("num_train_shards", type=int, nargs="?", default=8,
                        help="train shards to download after the val shard (default 8; 10B has 103, 100B 1030, "
                             "edu10B 99)")
    parser.add_argument("--variant", choices=VARIANTS, default="10B", help="which FineWeb (default 10B)")
    parser.add_argument("--out", type=Path,
                        help="folder for the shards (default data/fineweb<variant> in this repo, whatever the cwd)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    variant = VARIANTS[args.variant]
    if not 0 <= args.num_train_shards <= variant.train_shards:
        parser.error(f"num_train_shards={args.num_train_shards}, but {args.variant} has 0 to "
                     f"{variant.train_shards} train shards; ask for at most {variant.train_shards}")
    out = args.out or DATA_DIR / f"fineweb{args.variant}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"cached_fineweb10B.py: error: --out {out}: cannot create it ({error.strerror or error}); "
              f"give --out a folder you can write to", file=sys.stderr)
        return 2
    names = shard_names(variant.prefix, args.num_train_shards)
    todo = [name for name in names if not keep_if_valid(out / name)]
    print(f"{len(names) - len(todo)} of {len(names)} shards already in {out}; downloading {len(todo)} "
          f"from {variant.repo}")
    try:
        for name in todo:
            download(variant.repo, name, out)
    except DownloadError as error:
        print(f"cached_fineweb10B.py: error: {error}", file=sys.stderr)
        return 1
    print(f"{len(names)} valid shards in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
