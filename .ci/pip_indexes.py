"""Print pip's configured package indexes as uv options (`--index-url U --find-links F ...`).

uv reads no pip configuration; on a machine whose pip config names a local wheel directory (the CPU
torch wheel) or a mirror, uv must be told the same places.
"""

import shlex
import subprocess
import sys

listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {key.rsplit(".", 1)[-1]: (shlex.split(value) or [""])[0]
            for key, value in (line.split("=", 1) for line in listed.splitlines() if "=" in line)}
print(" ".join(f"--{option} {place}" for option in ("index-url", "extra-index-url", "find-links")
               for place in settings.get(option, "").split()))
