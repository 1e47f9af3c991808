"""Data for CuMA: value surveys (WorldValuesBench, synthetic) and preference data (Community
Alignment, PRISM, synthetic), their TFDS builders and grain pipelines.

prompts    the exact prompt strings (user turn, system turn, demographic profile sentence)
wvb        reads a WorldValuesBench manual directory into examples; writes that layout
synthetic  a synthetic survey with exact per-profile answer distributions (SurveyOracle)
fixtures   a small hand-written WVB directory for tests
builders   TFDS builders (array_record, no TensorFlow): cuma_world_values_bench/{full,sampled_50k},
           cuma_synthetic_survey/{default,tiny}
tokenize   chat-template tokenisation with next-token targets and answer-only loss mask
pipeline   the grain pipeline: make_dataset(source, tokenizer, ...) -> (batches, SurveyTables)

preference_sources    reads Community Alignment / PRISM files; records, skip counts, splits
synthetic_preference  synthetic preference data with known per-culture preferences
preference_builder    the TFDS builder cuma_preference (array_record) of all three
ca_prompts            the Community Alignment 4-way accuracy prompts (vanilla, persona, few-shot)
chat                  preference records -> chat SFT, DPO and prompt batches

Modules are imported explicitly (e.g. `from cuma_jax.data import builders`); importing this
package alone loads none of TFDS, grain or transformers.
"""
