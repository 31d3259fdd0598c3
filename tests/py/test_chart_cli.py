"""Every flag and PALISADE_* variable the chart gives palisade-ca and palisade-injector is one
their real command lines accept, with a value they accept: checked against `serve --help` of
the binaries that scripts/test.sh builds before the Python checks (PALISADE_BIN_DIR)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from chart_support import REPO, SWITCHES, VALUE_SETS, command_line, render

BIN_DIR = Path(os.environ.get("PALISADE_BIN_DIR", REPO / "target" / "debug"))

# Settings the chart passes that the binary does not have yet, with the issue that adds them.
# An entry that the binary has gained fails the test: remove it here then.
PENDING = {
    "palisade-ca": {},
    "palisade-injector": {},
}


def help_of(binary: str) -> str:
    path = BIN_DIR / binary
    assert path.is_file(), (
        f"{path} is missing: build it first (scripts/test.sh runs `cargo build --workspace --bins`"
        " and sets PALISADE_BIN_DIR)"
    )
    proc = subprocess.run([str(path), "serve", "--help"], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def options(help_text: str) -> dict[str, dict]:
    """{"--flag": {"env": "PALISADE_X", "values": [...] or None, "takes_value": bool}} from clap's
    long help."""
    out = {}
    for block in re.split(r"\n(?=\s+(?:-\w, )?--)", help_text):
        m = re.match(r"\s+(?:-\w, )?(--[a-z0-9-]+)( <)?", block)
        if not m:
            continue
        env = re.search(r"\[env: (PALISADE_[A-Z0-9_]+)=", block)
        values = re.search(r"\[possible values: ([^\]]+)\]", block)
        out[m[1]] = {
            "env": env[1] if env else None,
            "values": [v.strip() for v in values[1].split(",")] if values else None,
            "takes_value": m[2] is not None,
        }
    return out


def test_help_parser_reads_clap_output():
    sample = (
        "Options:\n      --source <SOURCE>\n          Where [env: PALISADE_SOURCE=] [default: file]"
        " [possible values: file, kube]\n      --log <LOG>\n          Log filter [env: PALISADE_LOG=]\n"
        "      --manage-injector-tls\n          Issue it [env: PALISADE_MANAGE_INJECTOR_TLS=]\n"
        "  -h, --help\n          Print help\n"
    )
    assert options(sample) == {
        "--source": {"env": "PALISADE_SOURCE", "values": ["file", "kube"], "takes_value": True},
        "--log": {"env": "PALISADE_LOG", "values": None, "takes_value": True},
        "--manage-injector-tls": {"env": "PALISADE_MANAGE_INJECTOR_TLS", "values": None, "takes_value": False},
        "--help": {"env": None, "values": None, "takes_value": False},
    }


def container(rendered, name):
    (c,) = rendered.one("Deployment", name)["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("binary", ["palisade-ca", "palisade-injector"])
def test_chart_settings_exist_in_the_binary(binary):
    known = options(help_of(binary))
    env_of = {o["env"]: flag for flag, o in known.items() if o["env"]}
    pending_seen = set()
    for name in VALUE_SETS:
        c = container(render(name), binary)
        args = c["args"]
        sub, flags = command_line(args)
        assert sub == "serve"
        for flag, value in flags.items():
            assert flag in known, f"{name}: {binary} has no {flag}"
            # A switch the chart passes alone is one the binary takes without a value.
            assert known[flag]["takes_value"] == (flag not in SWITCHES), f"{name}: {flag} in {args}"
            allowed = known[flag]["values"]
            assert allowed is None or value in allowed, f"{name}: {flag} {value!r} not in {allowed}"
        for env in c.get("env", []):
            if env["name"] in PENDING[binary]:
                pending_seen.add(env["name"])
                continue
            assert env["name"] in env_of, f"{name}: {binary} reads no {env['name']}"
            allowed = known[env_of[env["name"]]]["values"]
            assert allowed is None or env["value"] in allowed, f"{name}: {env['name']}={env['value']!r} not in {allowed}"
            # A variable and its flag must not both be given.
            assert env_of[env["name"]] not in flags, f"{name}: {env['name']} and {env_of[env['name']]} both set"
    for pending in PENDING[binary]:
        assert pending not in env_of, f"{binary} now reads {pending}: drop it from PENDING"
    assert pending_seen == set(PENDING[binary])
