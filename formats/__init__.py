"""The contract between the two stages: the files they hand each other and the policies both must share.

The images file, the target store and its schema, the coding of stored targets and the loss arguments they
feed, the view records and their seeding, durable one-writer file writes, run specs and the command-line
pieces both stages use. Built on `dpal` only; `cache_teacher` and `train_student` import it, never each other.
"""
