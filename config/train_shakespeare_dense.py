# The dense baseline for config/train_shakespeare_mose.py: the same GPT with a plain 4 * n_embd MLP in every
# block, i.e. the forward FLOPs per token of the MoE at full width with k_exp = 2 (minus the tiny router), and the
# same training compute (4.0e13 FLOPs, inherited: 1,891 steps).
# python train.py config/train_shakespeare_dense.py
exec(open('config/train_shakespeare_mose.py').read())
out_dir = 'out-shakespeare-dense'
n_exp = 0
