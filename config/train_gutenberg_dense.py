# The dense baseline for config/train_gutenberg_mose.py: the same GPT with a plain 4 * n_embd MLP in every block,
# i.e. the forward FLOPs per token of the MoE at full width with k_exp = 2 (minus the tiny router), and the same
# training compute (8.0e13 FLOPs, inherited: 3,702 steps, 15.2M characters).
# python train.py config/train_gutenberg_dense.py
exec(open('config/train_gutenberg_mose.py').read())
out_dir = 'out-gutenberg-dense'
n_exp = 0
