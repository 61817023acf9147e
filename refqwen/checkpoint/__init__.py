"""Reading and writing checkpoints: Hugging Face folders (float or pre-quantized safetensors), GGUF
files and the embedded demo model. Every reader maps its tensors onto the Hugging Face names that
`weights.expected_shapes` lists, so the model code sees one naming whatever the file format.

    open.py             open_checkpoint(path): (path, config, weights read on demand, tokenizer)
    hf.py, gguf.py      the two file formats; demo.py assembles the embedded model
    quantized.py        the pre-quantized format and its readers; write_quantized.py writes it
    write_gguf.py       a llama.cpp Q8_0 GGUF
    weights.py          the expected names and shapes, parameter counts
"""
