"""The Dockerfile builds every image the chart references, from one build stage that runs the
tests' own cargo command, into distroless runtime images without a shell or package manager.
(No container engine runs here: the Dockerfile is checked as text.)"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from chart_support import CHART_DIR, DOCKERFILE, REPO

RUNTIME_TARGETS = {"palisade-ca", "palisade-injector", "palisade-proxy"}


def stages():
    """{stage name: {"from": image, "instructions": [(KEYWORD, text)]}} in file order."""
    text = DOCKERFILE.read_text()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    args, out, current = {}, {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and current is None:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
            continue
        if keyword == "FROM":
            m = re.match(r"(?P<image>\S+)\s+AS\s+(?P<name>\S+)$", rest, re.IGNORECASE)
            assert m, f"every stage is named: {line}"
            image = re.sub(r"\$\{(\w+)\}", lambda v: args[v[1]], m["image"])
            current = m["name"]
            out[current] = {"from": image, "instructions": []}
            continue
        out[current]["instructions"].append((keyword, rest))
    return out


def test_one_target_per_image():
    s = stages()
    assert RUNTIME_TARGETS <= set(s)


def test_targets_are_the_repositories_the_chart_uses():
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    repositories = {
        values["ca"]["image"]["repository"],
        values["injector"]["image"]["repository"],
        values["proxy"]["image"]["repository"],
    }
    assert repositories == RUNTIME_TARGETS


def test_runtime_images_are_distroless_without_shell_or_package_manager():
    s = stages()
    for target in RUNTIME_TARGETS:
        stage = s[target]
        assert stage["from"].startswith("gcr.io/distroless/"), (target, stage["from"])
        keywords = [k for k, _ in stage["instructions"]]
        # Nothing runs in a runtime stage (there is no shell to run it); files come by COPY.
        assert "RUN" not in keywords and "ADD" not in keywords, target
        entry = [v for k, v in stage["instructions"] if k == "ENTRYPOINT"]
        assert entry and entry[0].startswith('["/usr/local/bin/'), f"{target}: exec-form entrypoint"
        for k, v in stage["instructions"]:
            if k == "COPY":
                assert "--from=" in v, f"{target}: copies only from build stages: {v}"


def test_users():
    s = stages()
    users = {t: [v for k, v in s[t]["instructions"] if k == "USER"][-1] for t in RUNTIME_TARGETS}
    assert users["palisade-ca"] == "65532:65532"
    assert users["palisade-injector"] == "65532:65532"
    # DESIGN.md: the proxy runs as uid 1337, which the capture rules skip.
    assert users["palisade-proxy"] == "1337:1337"
    for t in RUNTIME_TARGETS:
        assert s[t]["from"].endswith(":nonroot"), t


def test_build_runs_the_tests_cargo_command():
    s = stages()
    runs = " ".join(v for k, v in s["build"]["instructions"] if k == "RUN")
    test_script = (REPO / "scripts" / "test.sh").read_text()
    m = re.search(r"^cargo build [^\n]*$", test_script, re.MULTILINE)
    assert m, "scripts/test.sh builds with cargo"
    assert m[0].strip() + " --release" in runs
    for binary in ("palisade-ca", "palisade-injector", "palisade-proxy"):
        assert f"target/release/{binary}" in runs


def test_proxy_image_carries_both_iptables_backends_for_palisade_init():
    # palisade-injector runs palisade-init from --proxy-image (injector/src/cli.rs), so the
    # proxy image is also the init image.
    s = stages()
    run = " ".join(v for k, v in s["iptables"]["instructions"] if k == "RUN")
    assert "xtables-legacy-multi" in run and "xtables-nft-multi" in run
    proxy = s["palisade-proxy"]["instructions"]
    assert ("COPY", "--from=iptables /rootfs/ /") in proxy
    assert ("COPY", "--from=build /out/palisade-proxy /usr/local/bin/palisade-proxy") in proxy
    for t in RUNTIME_TARGETS - {"palisade-proxy"}:
        assert ("COPY", "--from=iptables /rootfs/ /") not in s[t]["instructions"], t


# The programs `palisade-proxy init` runs for both families (proxy/src/init.rs picks a backend
# by rule count; without the IPv6 ones a dual-stack pod would have IPv6 closed, not meshed).
INIT_PROGRAMS = [f"{ip}tables{variant}" for ip in ("ip", "ip6")
                 for variant in ("", "-legacy", "-nft", "-legacy-save", "-nft-save")]
# What distroless/cc provides of its own: glibc (libc6).
GLIBC = {"libc.so.6", "libm.so.6", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "linux-vdso.so.1"}


def test_iptables_stage_collects_a_working_iptables(tmp_path):
    """Run the Dockerfile's own collection step against this machine's Debian (the same
    bookworm the stage starts from): both backends and every program palisade-init calls end
    up in the root filesystem, with every library they link except glibc."""
    import shutil
    import subprocess

    missing = [tool for tool in ("dpkg", "ldd") if not shutil.which(tool)]
    missing += [] if Path("/usr/sbin/xtables-nft-multi").exists() else ["iptables"]
    assert not missing, f"needs Debian's iptables installed (scripts/test.sh installs it): {missing}"
    runs = [v for k, v in stages()["iptables"]["instructions"] if k == "RUN"]
    (collect,) = [r for r in runs if "/rootfs" in r]
    rootfs = tmp_path / "rootfs"
    script = collect.replace("/tmp/files", str(tmp_path / "files")).replace("/rootfs", str(rootfs))
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]

    sbin = rootfs / "usr" / "sbin"
    for program in INIT_PROGRAMS:
        target = (sbin / program).resolve()
        assert target.is_relative_to(rootfs) and target.is_file(), f"{program} -> {target}"
    assert not (sbin / "iptables-apply").exists(), "shell scripts are left out: there is no shell"
    for f in rootfs.rglob("*"):
        assert not f.name.endswith((".sh",)) and f.name not in {"sh", "bash", "dash", "apt", "dpkg"}, f

    libdirs = sorted({str(p.parent) for p in rootfs.rglob("*.so.*")})
    env = {"LD_LIBRARY_PATH": ":".join(libdirs), "PATH": "/usr/bin:/bin"}
    binaries = [sbin / "xtables-nft-multi", sbin / "xtables-legacy-multi", *rootfs.rglob("xtables/*.so")]
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            name = parts[0].rsplit("/", 1)[-1]
            resolved = parts[2] if len(parts) > 2 and parts[1] == "=>" else ""
            assert "not found" not in line, f"{binary.name}: {line.strip()}"
            assert name in GLIBC or resolved.startswith(str(rootfs)), f"{binary.name} links {line.strip()} from the host"


def test_the_build_stage_copies_every_workspace_member():
    """`cargo build --workspace --locked` in the build stage needs every member's sources: a
    crate added to the workspace but not copied breaks every image."""
    import tomllib

    manifest = tomllib.loads((REPO / "Cargo.toml").read_text())
    members = [m for m in manifest["workspace"]["members"] if m != "."]
    bench_dirs = {Path(b["path"]).parts[0] for b in manifest.get("bench", []) if "path" in b}
    copied = {rest.split()[0].rstrip("/") for keyword, rest in stages()["build"]["instructions"]
              if keyword == "COPY" and not rest.startswith("--")}
    needed = {Path(m).parts[0] for m in members} | bench_dirs | {"src"}
    missing = sorted(needed - copied)
    assert not missing, f"the Dockerfile's build stage does not COPY {missing}: add `COPY <dir> ./<dir>`"
