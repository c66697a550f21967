"""The one place skt imports scikit-learn's private helpers.

An upgrade of scikit-learn that moves any of these touches this file only.
"""

from sklearn.base import _fit_context
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions, validate_params
from sklearn.utils.validation import _num_samples

__all__ = ["HasMethods", "Interval", "StrOptions", "_fit_context", "_num_samples",
           "validate_params"]
