"""Algorithms that choose what to store: rate control and the encoders of the entropy-coded codecs.

(The scalar quantizers' encoders, rtn/gptq/learned rounding, still live beside their codec classes in
``nwcfmt.codecs``; they move here when a change touches them.)
"""
