# The dense baseline for config/train_gutenberg_mose.py: the same GPT with nanoGPT's 4 * n_embd MLP in every block
# instead of the MoE layer, for the same training compute (3.0e13 FLOPs, inherited). Its MLP is half the FLOPs of
# the MoE's two active experts (144.8k forward FLOPs per token against 212.4k), so it gets 16,857 steps to the MoE's
# 11,494: equal training FLOPs, not equal active parameters.
# python train.py config/train_gutenberg_dense.py
exec(open('config/train_gutenberg_mose.py').read())
out_dir = 'out-gutenberg-dense'
n_exp = 0
