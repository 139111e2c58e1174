"""Packaging for `bagel`, driven by `settings.ini` (the nbdev 2.x convention).

Every value lives in settings.ini so that nbdev and pip read the same facts; this file only
translates them. Extras: each `extra_<name>` key becomes `pip install bagel[<name>]`, and
`dev` collects the dev requirements.
"""
from configparser import ConfigParser
from pathlib import Path

import setuptools

here = Path(__file__).parent
cfg = ConfigParser(delimiters=["="])
cfg.read(here / "settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

required = "version description keywords author author_email license min_python lib_name".split()
missing = [k for k in required if k not in cfg]
if missing:
    raise SystemExit(f"settings.ini lacks {missing}: add them under [DEFAULT]")

licenses = {"apache2": "Apache-2.0"}  # SPDX expression
lic = licenses[cfg["license"]]
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable"]
py_versions = "3.10 3.11 3.12 3.13".split()
min_python = cfg["min_python"]

def _split(key):
    return cfg.get(key, "").split()

extras = {k[len("extra_"):]: _split(k) for k in cfg if k.startswith("extra_")}
extras["dev"] = _split("dev_requirements")
readme = here / "README.md"

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=readme.read_text(encoding="utf-8") if readme.exists() else "",
    long_description_content_type="text/markdown",
    license=lic,
    author=cfg["author"],
    author_email=cfg["author_email"],
    url=cfg["git_url"],
    keywords=cfg["keywords"],
    classifiers=[
        f"Development Status :: {statuses[int(cfg['status'])]}",
        f"Intended Audience :: {cfg['audience']}",
        f"Natural Language :: {cfg['language']}",
    ] + [f"Programming Language :: Python :: {v}" for v in py_versions[py_versions.index(min_python):]],
    packages=setuptools.find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    include_package_data=True,
    install_requires=_split("requirements"),
    extras_require=extras,
    python_requires=f">={min_python}",
    zip_safe=False,
    entry_points={
        "console_scripts": _split("console_scripts"),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
)
