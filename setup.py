"""Maps the top-level folders onto the installed `pagoda.*` namespace.

pagoda installs as `pagoda.engine`, `pagoda.kernels` and `pagoda.cluster` from the folders
`engine/`, `kernels/` and `cluster/` (never as top-level `engine`/`kernels`, whose generic names
collide with other packages). Subpackages are found automatically so new folders need no edit here.
"""
from setuptools import find_packages, setup

TOP_LEVEL = ("engine", "kernels", "cluster")

package_dir: dict[str, str] = {}
for top in TOP_LEVEL:
    package_dir[f"pagoda.{top}"] = top
    for sub in find_packages(top):
        package_dir[f"pagoda.{top}.{sub}"] = f"{top}/" + sub.replace(".", "/")

setup(packages=list(package_dir), package_dir=package_dir)
