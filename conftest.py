"""Collection rules for the package's docstring examples (``--doctest-modules``, see pyproject.toml).

``sed_discriminator.integrations.basicsr`` imports BasicSR, an optional extra: without it the
module is not collected (its own tests, in tests/, say why they are skipped).
"""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("basicsr") else ["sed_discriminator/integrations/basicsr"]
