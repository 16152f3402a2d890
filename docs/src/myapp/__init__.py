"""The application the testing guide's examples test (stands for yours)."""
