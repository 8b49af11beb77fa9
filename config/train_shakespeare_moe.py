# The plain-MoE baseline for config/train_shakespeare_mose.py: the same model, data and steps, trained at
# full width only. python train.py config/train_shakespeare_moe.py
exec(open('config/train_shakespeare_mose.py').read())
out_dir = 'out-shakespeare-moe'
width_sampling = 'none'
