"""Checks the compose files against the binary they run: every ulm service's
command is a subcommand the binary accepts, with flags it knows, and every
ULM_* variable it sets is one the subcommand reads. The load balancer's
upstreams name services of the file. (No container runtime in CI: this is
what can go stale without one.)

Usage: python3 check_compose.py path/to/ulm-server
"""

import pathlib
import re
import subprocess
import sys

import yaml

binary = sys.argv[1]
root = pathlib.Path(__file__).resolve().parents[2]
checked = 0
for compose in sorted((root / "docker").glob("compose*.yaml")):
    services = yaml.safe_load(compose.read_text())["services"]
    for name, service in services.items():
        build = service.get("build") or {}
        if "Dockerfile" not in str(build.get("dockerfile", "")):
            continue
        command = service.get("command", ["serve"])
        subcommand, flags = command[0], command[1:]
        help_text = subprocess.run(
            [binary, subcommand, "--help"], capture_output=True, text=True, check=True
        ).stdout
        for flag in flags:
            if flag.startswith("--"):
                assert flag.split("=")[0] in help_text, f"{compose.name} {name}: {flag} unknown to {subcommand}"
        for var in service.get("environment", {}):
            if var.startswith("ULM_"):
                known = re.search(rf"\[env: {var}[=\]]", help_text)
                assert known, f"{compose.name} {name}: {var} unknown to {subcommand}"
        checked += 1
    for conf in re.findall(r"\./(nginx[\w.-]*\.conf)", compose.read_text()):
        upstreams = re.findall(r"server (\S+):\d+", (root / "docker" / conf).read_text())
        assert upstreams, conf
        for host in upstreams:
            assert host in services, f"{conf}: upstream {host} is no service of {compose.name}"
assert checked >= 4, checked
print(f"compose files: {checked} ulm services match the binary's options")
