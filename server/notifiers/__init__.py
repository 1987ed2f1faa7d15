"""OTP delivery backends behind the `Notifier` port."""
