"""``python -m sara_ds.ds_to_universal``: DeepSpeed's ``ds_to_universal`` for checkpoints of a sara_ds optimizer
(``sara_ds.integrations.deepspeed_universal``)."""
from .integrations.deepspeed_universal import main

if __name__ == "__main__":
    main()
