"""How matrices are spread over ranks: tensor parallelism (``tensor_parallel``), ZeRO's flat partitions (``zero``),
and which data-parallel rank steps which matrix (``ownership``). The engine adapters (``sara_ds.integrations``)
build their layouts (``sara_ds.layout``) from these."""
