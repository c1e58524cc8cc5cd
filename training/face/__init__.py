"""Face embedder: LFW verification metrics, the teacher's distillation targets, student models and training.

`python -m training face --help` trains; `python -m converter face --help` quantises and gates.
"""
