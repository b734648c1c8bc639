"""markerlab's data package: personas, questions, generation backends, on-policy completions, datasets.

    from data.personas import system_prompt, messages
    from data.questions import data_questions, eval_questions, Question
    from data.generation import SamplingSpec, Sample, make_backend, resolve_backend
    from data.onpolicy import run_onpolicy            # stage `generate`
    from data.builder import build_dataset, write_dataset   # stage `data`
    from data.records import read_examples, validate_example

Submodules are imported on demand (nothing heavy is imported here), so
`import data.personas` does not pull in torch or vLLM.
"""
