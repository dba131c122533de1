"""Switch params.yaml between profiles (profiles/<name>.yaml) without losing its comments.

    python -m depthpipe.profile tutorial   # ResNet-50, 500 + 50 epochs, 4 GPUs
    python -m depthpipe.profile demo       # back to the embedded CPU demo

A profile lists only the keys it sets; every other value and every comment in params.yaml stays
as it is. The result is validated before params.yaml is replaced.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from depthpipe.atomic import write_text_atomic
from depthpipe.config import parse_params
from depthpipe.errors import ConfigError, run_cli


def _round_trip() -> YAML:
    yaml = YAML()  # round-trip mode: keeps comments, order and flow style
    yaml.preserve_quotes = True
    yaml.width = 100
    # ruamel writes None as an empty value; params.yaml spells it null (data.local.diode: null).
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return yaml


def apply_overrides(target: Any, overrides: dict[str, Any], key: str = "") -> None:
    for name, value in overrides.items():
        dotted = f"{key}.{name}" if key else name
        if name not in target:
            raise ConfigError(f"profile key {dotted}: not in params.yaml")
        if isinstance(value, dict):
            apply_overrides(target[name], value, dotted)
        elif isinstance(value, list) and isinstance(target[name], list):
            # In place: the sequence keeps its flow style ([outdoor]) and its comment.
            target[name][:] = value
        else:
            target[name] = value


def apply_profile(params_file: Path, profile_file: Path) -> None:
    if not profile_file.is_file():
        raise ConfigError(f"{profile_file}: no such profile")
    yaml = _round_trip()
    document = yaml.load(params_file.read_text())
    apply_overrides(document, YAML(typ="safe").load(profile_file.read_text()) or {})
    buffer = io.StringIO()
    yaml.dump(document, buffer)
    text = buffer.getvalue()
    parse_params(YAML(typ="safe").load(text))  # never write a params.yaml the stages reject
    write_text_atomic(params_file, text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="a file name in profiles/ without .yaml (demo, tutorial)")
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder")
    args = parser.parse_args()
    profile = args.root / "profiles" / f"{args.name}.yaml"
    apply_profile(args.root / "params.yaml", profile)
    print(f"params.yaml now follows {profile}")


if __name__ == "__main__":
    run_cli(main)
