"""scikit-learn's GridSearchCV on a farpool cluster through the joblib backend.

``farpool.joblib.register()`` adds the joblib backend "farpool"; inside
``parallel_config(backend="farpool")`` every ``n_jobs=-1`` of scikit-learn (the
cross-validation fits of ``GridSearchCV`` here) runs as farpool tasks, on all
the CPUs of the cluster.  Nothing else in the program changes.

Run it with ``python examples/joblib_gridsearch.py`` (needs scikit-learn:
``pip install scikit-learn``).
"""

import time

from joblib import parallel_config
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import SVC

import farpool.joblib


def main() -> None:
    farpool.joblib.register()
    X, y = load_digits(return_X_y=True)
    X, y = X[:800], y[:800]
    grid = {"C": [0.1, 1.0, 10.0], "gamma": [0.0005, 0.001, 0.005]}
    started = time.perf_counter()
    with parallel_config(backend="farpool"):
        search = GridSearchCV(SVC(), grid, cv=3, n_jobs=-1).fit(X, y)
    elapsed = time.perf_counter() - started
    fits = len(search.cv_results_["params"]) * search.n_splits_
    print(f"{fits} fits on the farpool cluster in {elapsed:.2f} s")
    print(f"best parameters {search.best_params_}, accuracy {search.best_score_:.3f}")


if __name__ == "__main__":
    main()
