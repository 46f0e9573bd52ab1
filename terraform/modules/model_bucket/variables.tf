variable "name" {
  type        = string
  description = "Prefix of the bucket name; S3 appends a unique suffix."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name))
    error_message = "name must be 3-20 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "force_destroy" {
  type        = bool
  description = "Let `terraform destroy` delete the bucket with its objects. The bucket is a cache of public weights, so this is on by default."
  default     = true
}

variable "noncurrent_version_expiration_days" {
  type        = number
  description = "Days an overwritten or deleted object version is kept before it expires."
  default     = 30

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1 && var.noncurrent_version_expiration_days <= 3650
    error_message = "noncurrent_version_expiration_days must be between 1 and 3650."
  }
}
