"""`kiln cache ls` and `kiln cache clean`: what kiln keeps under $KILN_HOME and how to reclaim it.

Two kinds of entries: pulled models (`models/NAME/`) and native kernel builds (`build/NAME-KEY/`,
one per sources × flags × compiler × torch × CPU features; see kiln.kernels.build_cache). `clean`
removes builds other than the one this checkout loads on this CPU (with --all, that one too) and
models only when named; it never touches a folder a running build holds locked.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from kiln.errors import KilnError


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("cache", help="list or clean kiln's cache (pulled models, native kernel builds)")
    actions = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="models and native builds with their sizes; marks the build in use here")
    ls.set_defaults(func=cmd_cache_ls)
    clean = actions.add_parser("clean", help="remove native builds not used by this checkout on this CPU")
    clean.add_argument("--all", action="store_true", help="remove every native build, the current one too")
    clean.add_argument("--model", action="append", default=[], metavar="NAME",
                       help="also remove this pulled model (repeatable)")
    clean.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    clean.set_defaults(func=cmd_cache_clean)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def _current_build() -> Path | None:
    from kiln.kernels.native import current_build_folder

    try:
        return current_build_folder()
    except Exception:  # a broken compiler must not stop a listing
        return None


def _models() -> list[tuple[Path, int]]:
    from kiln.hub import kiln_home
    from kiln.kernels.build_cache import folder_size

    root = kiln_home() / "models"
    return [(p, folder_size(p)) for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []


def cmd_cache_ls(args: argparse.Namespace) -> None:
    from kiln.hub import kiln_home
    from kiln.kernels.build_cache import list_builds
    from kiln.kernels.build_lock import is_locked

    home = kiln_home()
    print(f"kiln cache: {home}")
    models = _models()
    print(f"\nmodels ({_size(sum(s for _, s in models))}):")
    for path, size in models:
        print(f"  {path.name:<28} {_size(size):>10}")
    if not models:
        print("  (none; `kiln pull` fetches the default model)")
    current = _current_build()
    builds = list_builds()
    print(f"\nnative kernel builds ({_size(sum(b.size_bytes for b in builds))}):")
    for build in builds:
        if build.info is None and is_locked(build.path):
            state, detail = "busy", "a build is running in it now"
        elif build.info is None:
            state, detail = "stale", "an older kiln's layout (not keyed by CPU features); `kiln cache clean` removes it"
        else:
            key = build.info.get("key", {})
            features = key.get("target_features", []) if isinstance(key, dict) else []
            torch_version = key.get("torch_version", "?") if isinstance(key, dict) else "?"
            state = "in use" if current is not None and build.path == current else "other"
            top = [f for f in features if f.startswith(("AVX512", "AMX", "AVX2"))]  # type: ignore[union-attr]
            detail = (f"torch {torch_version}, {len(features)} CPU features ({', '.join(top[:4]) or 'portable'}"
                      f"{', …' if len(top) > 4 else ''}), last used {_when(build.last_used)}")
        print(f"  {build.path.name:<34} {_size(build.size_bytes):>10}  {state:<6}  {detail}")
    if not builds:
        print("  (none yet; the first run builds one for this CPU)")


def cmd_cache_clean(args: argparse.Namespace) -> None:
    from kiln.kernels.build_cache import list_builds, remove_builds
    from kiln.kernels.build_lock import is_locked

    current = _current_build()
    doomed = [b for b in list_builds() if args.all or current is None or b.path != current]
    doomed = [b for b in doomed if not is_locked(b.path)]  # a build in progress is left alone
    models = dict(_models())
    unknown = [m for m in args.model if not any(p.name == m for p in models)]
    if unknown:
        raise KilnError(f"no pulled model named {', '.join(unknown)} in the cache; `kiln cache ls` lists them")
    verb = "would remove" if args.dry_run else "removed"
    freed = 0
    for build in doomed:
        print(f"{verb} build {build.path.name} ({_size(build.size_bytes)})")
    if not args.dry_run:
        freed += remove_builds(doomed)
    else:
        freed += sum(b.size_bytes for b in doomed)
    for path, size in models.items():
        if path.name in args.model:
            print(f"{verb} model {path.name} ({_size(size)})")
            freed += size
            if not args.dry_run:
                shutil.rmtree(path, ignore_errors=True)
    print(f"{'would free' if args.dry_run else 'freed'} {_size(freed)}")
