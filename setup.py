"""Build hook for the optional native kernel; all metadata lives in pyproject.toml.

The extensions are optional: where no C compiler is available the build skips them and nwcfmt uses its numpy/torch
implementations (bit-identical, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nwcfmt.codecs._lossless_native",
            ["nwcfmt/codecs/_lossless_native.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "nwcfmt.entropy._rans_native",
            ["nwcfmt/entropy/_rans_native.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
        Extension(
            "nwcfmt.kernels._cpu_native",
            ["nwcfmt/kernels/_cpu_native.c"],
            extra_compile_args=["-O3"],
            optional=True,
        ),
    ]
)
