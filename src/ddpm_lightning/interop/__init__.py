"""Conversions to and from other libraries' formats (diffusers: needs ``pip install diffusers``)."""
