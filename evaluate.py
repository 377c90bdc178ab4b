"""VAP-Toy evaluation: semantic alignment, paired reference sensitivity and fidelity against ground truth,
beside the ceilings and floors that bound them.

    python evaluate.py                                  # the shipped toy default, 200 pairs x 3 seeds
    python evaluate.py --pipeline runs/toy/out/pipeline --pairs 50 --seeds 0

See vapjax/toy/evaluate.py for what each metric means.
"""
from vapjax.toy.evaluate import main

if __name__ == "__main__":
    main()
