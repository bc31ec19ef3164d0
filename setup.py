from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="blobserve",
    version="0.1.0",
    description="A pull-through cache for OCI registry blobs, on Twisted.",
    long_description=Path("README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    python_requires=">=3.10",
    packages=[
        *find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]),
        "twisted.plugins",
    ],
    install_requires=[
        "attrs>=23.1",
        "bcrypt>=4",
        "prometheus_client>=0.20",
        "rich>=13",
        "tomli>=2; python_version<'3.11'",
        "treq>=24.9",
        "twisted>=24.7",
    ],
    entry_points={
        "console_scripts": [
            "blobserve-fsck = blobserve.fsck:main",
            "blobserve-config-check = blobserve.config_check:main",
            "blobserve-prefetch = blobserve.prefetch.cli:main",
            "blobserve-haproxy-config = blobserve.cluster:main",
        ]
    },
    extras_require={
        "test": [
            "bcrypt>=4",
            "cryptography>=42",
            "hypothesis>=6.100",
            "mypy>=1.10",
            "mypy-zope>=1.0",
            "pytest>=8",
            "pytest-twisted>=1.14",
            "ruff>=0.5",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
