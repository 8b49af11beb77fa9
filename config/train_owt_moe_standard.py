# The plain-MoE baseline for config/train_owt_mose_standard.py: same model and tokens, full width only.
exec(open('config/train_owt_mose_standard.py').read())
out_dir = 'out-owt-moe-standard'
wandb_run_name = 'moe-standard'
width_sampling = 'none'
