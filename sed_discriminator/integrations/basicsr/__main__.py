"""``python -m sed_discriminator.integrations.basicsr -opt options.yml``: see :func:`main`."""

from . import main

main()
