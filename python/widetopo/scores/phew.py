from widetopo.scores.base import Scorer
class PHEWScorer(Scorer):
    def score(s,c,b): pass
