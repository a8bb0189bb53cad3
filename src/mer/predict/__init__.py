"""Expert predictors: score the experts of the MoE layers ahead from the routing so far.

One interface (`base.Predictor`), one small module each: the frequency baseline,
a 2nd-order Markov chain, a learned speculator, router lookahead, their ensemble;
`evaluate` measures top-k recall and precision per layer distance.
"""
