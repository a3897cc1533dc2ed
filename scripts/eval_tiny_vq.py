"""What the embedded discrete prior caps: `python scripts/eval_tiny_vq.py [--path P] [--table SWEEP]`.

See g2d2/train/evaluate.py.
"""

from g2d2.train.evaluate import main

if __name__ == "__main__":
    main()
