"""Prompts rendered from the human annotation in ``principles/`` (one function per prompt), by job:

* :mod:`selfalign.prompts.annotation`: the loaders (principles, exemplars, turn template, identity,
  seed tasks, red-team types, step-1 templates), each validating its file.
* :mod:`selfalign.prompts.red_team`: step 1's raw-completion prompts;
  :mod:`selfalign.prompts.red_team_parse` reads their continuations back.
* :mod:`selfalign.prompts.self_align`: the self-align preamble (step 2, the ``prompted`` variant) and
  the parsing of its thoughts.
* :mod:`selfalign.prompts.training`: the training template the engraved and verbose models see.

This file holds no code on purpose: a stage's DVC deps are the modules it imports, and importing one
submodule must not make every stage depend on all of them.
"""
