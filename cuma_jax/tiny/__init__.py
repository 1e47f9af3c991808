"""Small offline stand-ins for what a real run downloads: a byte-level BPE tokenizer with
Qwen3's / Llama 3's chat format, a random tiny Qwen3 backbone (which the runtime warms up on the
task's data), and WorldValuesBench, Community Alignment and PRISM fixtures.  The embedded
default job, the tests and the notebooks build everything from here; nothing is fetched.

tokenizer    build_tiny_tokenizer(corpus, out_dir, chat_format="qwen3"|"llama3")
backbone     write_random_qwen3(directory, tokenizer, tiny_backbone), tiny_qwen3_config(...)
wvb_fixture  write_wvb_fixture(root): a hand-written WVB directory with known bad cells
preference_fixture  write_preference_fixture(root, layout): Community Alignment and PRISM
             files in every supported layout, with known bad rows
"""
