# Upcycling: turn the trained dense Shakespeare GPT (config/train_shakespeare_dense.py) into a MoSE model and
# continue with multi-width training: the small-scale analogue of the paper's continual pre-training of a
# pretrained MoE. Every expert starts as a copy of the dense MLP (so it starts at the dense model's loss), and
# each expert's hidden units are sorted by importance so the narrow prefixes start from the most useful ones
# (compare --upcycle_reorder=False).
# python train.py config/upcycle_shakespeare_mose.py
exec(open('config/train_shakespeare_mose.py').read())
init_from = 'upcycle:out-shakespeare-dense'
out_dir = 'out-shakespeare-upcycle'
expert_hidden = 512              # the dense MLP's 4 * n_embd hidden units, copied into each expert
max_train_flops = 0.0            # a step count, not the main job's training compute
max_iters = 200
width_sampling = 'max_random'   # the recipe RESULTS.md's upcycling numbers ("the 1,000-step runs of the previous
width_data = 'fresh'            # recipe") were measured with: the full width plus one random width (continuous),
                                # each on its own batch
width_grid = 0.0
width_mix = ()                  # no stated law: continuous widths
lr_decay_iters = 200
learning_rate = 1e-3             # gentler than from scratch: the weights are already trained
min_lr = 1e-4
warmup_iters = 20
eval_interval = 100
