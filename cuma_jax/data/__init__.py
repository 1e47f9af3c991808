"""Survey data for CuMA: prompts, WorldValuesBench and synthetic surveys, TFDS, grain.

prompts    the exact prompt strings (user turn, system turn, demographic profile sentence)
wvb        reads a WorldValuesBench manual directory into examples; writes that layout
synthetic  a synthetic survey with exact per-profile answer distributions (SurveyOracle)
fixtures   a small hand-written WVB directory for tests
builders   TFDS builders (array_record, no TensorFlow): cuma_world_values_bench/{full,sampled_50k},
           cuma_synthetic_survey/{default,tiny}
tokenize   chat-template tokenisation with next-token targets and answer-only loss mask
pipeline   the grain pipeline: make_dataset(source, tokenizer, ...) -> (batches, SurveyTables)

Modules are imported explicitly (e.g. `from cuma_jax.data import builders`); importing this
package alone loads none of TFDS, grain or transformers.
"""
