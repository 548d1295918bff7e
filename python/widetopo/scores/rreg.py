from widetopo.scores.base import Scorer
class RRegScorer(Scorer):
    def score(s,c,b): pass
