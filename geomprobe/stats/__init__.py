"""Pure statistics of samples: the gradient-noise tail index (:mod:`.tails`), covariance and isotropy
statistics of sample Gram matrices (:mod:`.covariance`), and the streaming accumulation of gradient-noise
samples those build on (:mod:`.gradient_noise`), and Student's t quantiles for studentized intervals
(:mod:`.student`), repeated confidence intervals for estimators that stop at a look (:mod:`.sequential`), and samples
without replacement at a cost independent of the population (:mod:`.sampling`)."""
