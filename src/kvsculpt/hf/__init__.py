"""Everything that touches a Hugging Face model: loading, dimensions, the attention function, decoding,
and the capture of keys, values and reference queries."""
