"""Build hook for the optional native kernel; all metadata lives in pyproject.toml.

The extension is optional: where no C compiler is available the build skips it and nwcfmt uses its numpy
implementation (bit-identical, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "nwcfmt.codecs._lossless_native",
            ["nwcfmt/codecs/_lossless_native.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
