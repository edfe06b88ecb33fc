"""Maps the top-level folders onto the installed `pagoda.*` namespace.

pagoda installs as `pagoda.engine`, `pagoda.kernels` and `pagoda.cluster` from the folders
`engine/`, `kernels/` and `cluster/`, never as top-level `engine`/`kernels`/`cluster`, whose generic
names collide with other packages (transformers imports a PyPI package called `kernels`). So that
no folder of ours shadows such a package when the repository root is on `sys.path`, `kernels/` is a
namespace package (no `__init__.py`) and `engine/`, `cluster/` refuse to load under a top-level name.
Subpackages are found automatically so new folders need no edit here.
"""
from setuptools import find_namespace_packages, setup

TOP_LEVEL = ("engine", "kernels", "cluster")

package_dir: dict[str, str] = {}
for top in TOP_LEVEL:
    package_dir[f"pagoda.{top}"] = top
    for sub in find_namespace_packages(top, exclude=["*__pycache__*"]):
        package_dir[f"pagoda.{top}.{sub}"] = f"{top}/" + sub.replace(".", "/")

setup(packages=list(package_dir), package_dir=package_dir)
