"""The lens: what the app shows, as plain functions -- analyses of one image, figures, exports, and the
guards a public app needs (model specs, images, sessions, temporary files)."""
