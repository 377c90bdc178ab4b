"""VAP-Toy: a synthetic world where video-as-prompt transfer is measurable, and its trained default.

  world     scenes, 22 semantic conditions (motion, camera, style, concept), pairs, captions, splits
  oracle    a small classifier that reads a clip's condition (the measuring instrument)
  evaluate  alignment, paired reference sensitivity, fidelity, and their ceilings and floors (`python evaluate.py`)
  build     trains the default from scratch with the project's models and trainer (`python -m vapjax.toy.build`)
  ablate    the paper's ablations trained and evaluated on the toy (`python -m vapjax.toy.ablate`)
  diagnose  where a trained model loses the semantics, in latent space (`python -m vapjax.toy.diagnose`)
"""
