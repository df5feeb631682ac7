"""Makes the cluster profiles under slurm/profiles/ selectable as config options
(`launcher=example_a100`), plus any directory in $RS_PROFILES laid out the same way."""

from __future__ import annotations

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class ClusterProfiles(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        import retrieval_scaling

        shipped = Path(retrieval_scaling.__file__).resolve().parents[1] / "slurm" / "profiles"
        for directory in (os.environ.get("RS_PROFILES"), shipped):
            if directory and Path(directory).is_dir():
                search_path.append("retrieval-scaling-profiles", f"file://{Path(directory).resolve()}")
