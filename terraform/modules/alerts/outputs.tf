output "topic_arn" {
  description = "ARN of the alerts topic (the monitoring role's monitoring_alert_sns_topic_arn)."
  value       = aws_sns_topic.this.arn
}

output "email_subscription" {
  description = "The e-mail address subscribed to the topic, or null."
  value       = var.alert_email
}
